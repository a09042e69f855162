"""The type berth gives transformers' models."""

from typing import Any, TypeAlias

# A transformers model (BertForPreTraining, ModernBertForMaskedLM, ...ForSequenceClassification). berth reaches
# into its parts by attribute (bert, cls.predictions, model, head, classifier), which nn.Module types as
# `Tensor | Module`; the parts are checked by the tests against transformers' own classes instead.
HFModel: TypeAlias = Any
