"""mtbert_utils: multitask fine-tuning of BERT on SST, Quora and STS.

One module per concept: data, model, schedules, pcgrad, training,
evaluation, plotting, reproduce, bench.
"""

__version__ = "0.1.0"

TASKS = ("sst", "para", "sts")
