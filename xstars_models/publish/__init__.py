"""Publishing: a model to a Hugging Face Hub repo in one commit (:mod:`.push`) with the model card
written from its config (:mod:`.card`), and the registry entry of what landed."""

from .card import CITATION, model_card
from .push import manifest_entry, push_to_hub, write_manifest_entry

__all__ = ["CITATION", "manifest_entry", "model_card", "push_to_hub", "write_manifest_entry"]
