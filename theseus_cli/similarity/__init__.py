"""Representational similarity: the losses alignment minimises (a registry: linear CKA, unbiased CKA, D-MNN, feature regression)
and the metrics reports show."""

from theseus_cli.similarity.registry import (SIMILARITIES, LossFn, Similarity, get_similarity, make_loss, min_batch,
                                             register_similarity)
from theseus_cli.similarity.cka import (MIN_BATCH, cka_loss, gram_is_cheaper, linear_cka, normalise_rows,  # noqa: E402
                                        sequence_rows, ucka_loss, unbiased_cka)
from theseus_cli.similarity.dmnn import dmnn_loss, mutual_knn, soft_mnn  # noqa: E402
from theseus_cli.similarity.metrics import all_similarities  # noqa: E402
from theseus_cli.similarity.regression import relative_mse  # noqa: E402  (registers mse)

__all__ = ["SIMILARITIES", "LossFn", "Similarity", "get_similarity", "make_loss", "min_batch", "register_similarity",
           "MIN_BATCH", "cka_loss", "gram_is_cheaper", "linear_cka", "normalise_rows", "sequence_rows", "ucka_loss",
           "unbiased_cka", "dmnn_loss", "mutual_knn", "soft_mnn", "all_similarities", "relative_mse"]
