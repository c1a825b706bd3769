"""The example plugin's own tests: the kvpress-lab conformance suite plus one behaviour test."""

import pytest
import torch

from kvpress_lab.testing.conformance import conformance_cases, run_check


@pytest.mark.parametrize(("policy", "check"), conformance_cases(["keynorm"]))
def test_conformance(policy, check):
    run_check(policy, check)


def test_scorer_prefers_low_norm_keys():
    from kvlab_keynorm import KeyNormScorer

    from kvpress_lab.interfaces import StepLayout

    keys = torch.tensor([[[[3.0, 0.0], [0.1, 0.0], [1.0, 1.0]]]])  # [1, 1 head, 3 slots, 2]
    layout = StepLayout(3, 0, 1, 0, 3, 0, 0, torch.arange(3).view(1, 1, 3))
    scores = KeyNormScorer().score(
        layout, [None], torch.ones(1, 1, 3, dtype=torch.bool), lambda i: keys
    )
    assert scores.argsort(descending=True).flatten().tolist() == [1, 2, 0]
