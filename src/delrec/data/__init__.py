"""Data: loading raw formats, preprocessing, splits and frozen candidate sets."""

from delrec.data.candidates import CandidateSet, draw_candidates
from delrec.data.dataset import PAD, SeqDataset
from delrec.data.prepare import DataConfig, prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.splits import Example, Split, make_split

__all__ = [
    "PAD",
    "CandidateSet",
    "DataConfig",
    "Example",
    "PreprocessConfig",
    "SeqDataset",
    "Split",
    "draw_candidates",
    "make_split",
    "prepare_dataset",
]
