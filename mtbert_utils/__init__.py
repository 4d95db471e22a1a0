"""mtbert_utils: multitask fine-tuning of BERT on SST, Quora and STS.

One module per concept (the package map in README.md says what each holds):

    tasks, data, model                 the three tasks, their data, the multitask model
    config, presets                    TrainConfig and its named presets
    schedules, budget                  which tasks train in each step; examples budgets
    pcgrad, gradients                  gradient surgery; how task gradients are combined (by name)
    optim, checkpoint, selection       optimizer groups, run state on disk, the model a run reports
    training, train, distributed       the training loop, its command line, data parallel
    evaluation, stats                  dev/test scores, confidence intervals and paired tests
    experiments, tables, readings      what notebooks run and tabulate, and the prose from the tables
    plans, results, plotting, progress the runs each notebook makes, result files, figures, progress bars
    reproduce                          re-running the notebooks (or only their training runs)
    bench                              the entry point of the speed benchmark (benchmarks/speed.py)
"""

__version__ = "0.1.0"

TASKS = ("sst", "para", "sts")
