"""A resume replays this run's lr schedule to the checkpoint's step before any optimizer step; torch's
"lr_scheduler.step() before optimizer.step()" warning (printed by every rank on each resume) must not fire."""

import warnings

import torch

from switchyard.train.loop import _replay_schedule
from switchyard.train.schedule import build_scheduler


def test_replay_is_silent_and_lands_on_the_step():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = build_scheduler(optimizer, 8, 4, "cosine", 0.0)
    start = scheduler.state_dict()
    reference = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3), 8, 4, "cosine", 0.0)
    for _ in range(4):
        reference.optimizer.step()
        reference.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _replay_schedule(scheduler, start, 4)
    assert scheduler.get_last_lr() == reference.get_last_lr()
