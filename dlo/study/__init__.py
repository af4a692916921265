"""The efficiency study (recipes/study.py, docs/STUDY.md): how much of what extra depth buys does dynamic depth keep?

One concept per module, so that adding an arm or a testbed touches one place:

- ``testbed``: the testbed section and its cached build;
- ``arms``: an arm (overrides of the shared recipe) and the training compute it is planned to spend;
- ``config``: the study config that holds the recipe, the arms and the other sections;
- ``runs``: one recipes/sft.py process per arm and seed, resumed or reused;
- ``measurement`` and ``timing``: what is measured of every model;
- ``stats`` and ``preregistered``: aggregation over seeds and the pre-registered verdict;
- ``tables``, ``plots`` and ``report``: the outputs;
- ``diagnostics``: the training curves of every run;
- ``cli``: the driver behind recipes/study.py.
"""

from dlo.study.arms import match_training_flops
from dlo.study.cli import main
from dlo.study.config import load_study_config, select_arms
from dlo.study.measurement import load_trained
from dlo.study.runs import train_run
from dlo.study.stats import interval, t95

__all__ = ["interval", "load_study_config", "load_trained", "main", "match_training_flops", "select_arms", "t95",
           "train_run"]
