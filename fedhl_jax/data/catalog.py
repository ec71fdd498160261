"""The datasets that ship with the package, one :class:`~fedhl_jax.data.registry.DatasetSpec` each.

=============  ==========================  ===================================  =========  ===========
name           source fields               Hub (id, config)                     held-out   metric
=============  ==========================  ===================================  =========  ===========
``gsm8k``      question, answer            ``openai/gsm8k``, ``main``           ``test``   exact match
``codealpaca`` instruction, input, output  ``sahil2801/CodeAlpaca-20k``         slice      ROUGE-L
``dolly``      instruction, context,       ``databricks/databricks-dolly-15k``  slice      ROUGE-L
               response [, category]
=============  ==========================  ===================================  =========  ===========

Label kinds are described in :mod:`fedhl_jax.data.labels`.
"""

from __future__ import annotations

from fedhl_jax.data import labels as L
from fedhl_jax.data.registry import DatasetSpec, register_dataset

GSM8K = register_dataset(DatasetSpec(
    name="gsm8k", instruction="question", output="answer",
    local_files={"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)},
    hub_id="openai/gsm8k", hub_config="main",
    label_kinds={"steps": L.gsm8k_steps_labels, "answer_size": L.gsm8k_answer_size_labels},
    eval_split="test", metric="exact_match", embedded=True))

CODEALPACA = register_dataset(DatasetSpec(
    name="codealpaca", instruction="instruction", output="output", input="input",
    local_files={"train": ("codealpaca/code_alpaca_2k.jsonl",),
                 "new": ("codealpaca/new_codealpaca.jsonl",),
                 "all": ("codealpaca/code_alpaca_2k.jsonl", "codealpaca/new_codealpaca.jsonl")},
    hub_id="sahil2801/CodeAlpaca-20k",
    label_kinds={"language": L.code_language_labels}))

DOLLY = register_dataset(DatasetSpec(
    name="dolly", instruction="instruction", output="response", input="context", optional=("category",),
    local_files={"train": ("dolly/dolly_subset_151.jsonl",)},
    hub_id="databricks/databricks-dolly-15k",
    label_kinds={"category": L.dolly_category_labels, "derived": L.dolly_derived_labels,
                 "context": L.dolly_context_labels}))
