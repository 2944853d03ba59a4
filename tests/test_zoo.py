"""Zoo recipes: caching by config hash, captured optimizer state, weight snapshots (digits, offline)."""

from __future__ import annotations

import pytest
import torch

from kfac_lens import zoo

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    return zoo.example_network("quick", "digits", cache_dir=tmp_path_factory.mktemp("zoo"), progress=False)


def test_example_network_reaches_the_target_and_keeps_its_optimizer_state(entry):
    assert [L.d_out for L in entry.optimizer.view.layers] == [20, 20, 20, 20, 20, 10]
    assert float(entry.history["error"].iloc[-1]) <= zoo.EXAMPLE_PRESETS["quick"]["target_error"]
    assert entry.iteration == int(entry.history["iteration"].iloc[-1])
    assert entry.gamma == entry.optimizer.gamma and entry.optimizer.factors is not None


def test_cached_entry_is_loaded_not_retrained(entry):
    again = zoo.example_network("quick", "digits", cache_dir=entry.path.parent, progress=False)
    assert again.path == entry.path and again.iteration == entry.iteration and again.gamma == entry.gamma
    for p, q in zip(again.model.parameters(), entry.model.parameters()):
        assert torch.equal(p, q)


def test_snapshots_hold_earlier_weights(entry):
    its = entry.snapshot_iterations
    assert its and set(its) <= set(zoo.SNAPSHOT_ITERATIONS) and max(its) < entry.iteration
    early = entry.at_iteration(its[0])
    assert any(not torch.equal(p, q) for p, q in zip(early.parameters(), entry.model.parameters()))
    final = entry.at_iteration(entry.iteration)
    assert all(torch.equal(p, q) for p, q in zip(final.parameters(), entry.model.parameters()))
    with pytest.raises(ValueError, match="weights for iterations"):
        entry.at_iteration(10**6)


def test_bad_preset_and_data_are_refused():
    with pytest.raises(ValueError, match="preset"):
        zoo.example_network("huge")
    with pytest.raises(ValueError, match="digits"):
        zoo.example_network("quick", "cifar")
