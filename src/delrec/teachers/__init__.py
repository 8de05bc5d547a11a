"""Conventional sequential recommenders used as DELRec's teachers: SASRec, GRU4Rec, Caser.

    from delrec.teachers import TeacherConfig, train_teacher, predict_topk
    model = train_teacher(split, TeacherConfig(model="sasrec"), "runs/x/teacher")
    top10 = predict_topk(model, [ex.history for ex in split.examples("test")], k=10)
"""

from delrec.teachers import caser, gru4rec, sasrec  # noqa: F401  (registers the models)
from delrec.teachers.base import (
    MODEL_DEFAULTS,
    MODELS,
    TEACHERS,
    SeqRecommender,
    TeacherConfig,
    build_teacher,
)
from delrec.teachers.caser import Caser
from delrec.teachers.gru4rec import GRU4Rec
from delrec.teachers.sasrec import SASRec
from delrec.teachers.trainer import (
    Prefixes,
    evaluate,
    export_topk,
    full_ranks,
    pad_histories,
    predict_proba,
    predict_rollout,
    predict_topk,
    score_candidates,
    train_teacher,
)

__all__ = [
    "MODELS",
    "MODEL_DEFAULTS",
    "TEACHERS",
    "Caser",
    "GRU4Rec",
    "Prefixes",
    "SASRec",
    "SeqRecommender",
    "TeacherConfig",
    "build_teacher",
    "evaluate",
    "export_topk",
    "full_ranks",
    "pad_histories",
    "predict_proba",
    "predict_rollout",
    "predict_topk",
    "score_candidates",
    "train_teacher",
]
