"""Parameter-efficient fine-tuning: LoRA, prefix tuning, Houlsby adapters and (IA)³, from first principles.

    from nanomm import peft
    report = peft.apply(model, peft.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    print(report)                         # same numbers as peft's print_trainable_parameters()
    with peft.disable_adapters(model):    # the frozen base model, e.g. as DPO's reference
        ...
    peft.save(model, "out/adapter")       # peft's layout: PeftModel.from_pretrained reads LoRA/IA3/prefix
    peft.merge_and_unload(model)          # LoRA, IA3: a plain model with the update in its weights

Each method is a small module (lora, prefix, adapter, ia3) with ``inject`` and its file format;
``model`` puts them on a model and takes them off.
"""

from nanomm.peft.config import (CONFIGS, AdapterConfig, IA3Config, LoraConfig, PeftConfig, PrefixConfig,
                                config_from_dict, describe)
from nanomm.peft.model import (METHODS, PeftReport, apply, count_parameters, disable_adapters, has_adapters, load,
                               merge, merge_and_unload, peft_config, save, unload, unmerge)

__all__ = [
    "PeftConfig", "LoraConfig", "PrefixConfig", "AdapterConfig", "IA3Config", "CONFIGS", "config_from_dict", "describe",
    "METHODS", "PeftReport", "apply", "count_parameters", "disable_adapters", "has_adapters", "load", "merge",
    "merge_and_unload", "peft_config", "save", "unload", "unmerge",
]
