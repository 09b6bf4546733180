"""nanomm: the multimodal/NLP canon written from first principles in PyTorch.

Layers live in ``nanomm.nn``, architectures in ``nanomm.models``; ``nanomm tour`` walks the
19 topics of the notes and checks every figure against nanomm's own code.
"""

__version__ = "0.1.0"
