"""The tour: one chapter per topic of the notes (notes-zh.txt), each checking the notes' figures
against nanomm's own code and running a short live demo. ``nanomm tour`` runs it."""

from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.tour.runner import TOPICS, run_tour

__all__ = ["Chapter", "Claim", "TourContext", "TOPICS", "run_tour"]
