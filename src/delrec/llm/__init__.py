"""The LLM side of DELRec: backbone loading, the soft prompt, prompt templates, candidate scoring, generation."""

from delrec.llm.backbone import Backbone, BackboneConfig
from delrec.llm.prompts import SOFT_PROMPT_SLOT, lsr_prompt, rps_prompt, ta_prompt, truncate_history
from delrec.llm.scoring import TitleScorer
from delrec.llm.soft_prompt import SoftPrompt, SoftPromptConfig

__all__ = [
    "SOFT_PROMPT_SLOT",
    "Backbone",
    "BackboneConfig",
    "SoftPrompt",
    "SoftPromptConfig",
    "TitleScorer",
    "lsr_prompt",
    "rps_prompt",
    "ta_prompt",
    "truncate_history",
]
