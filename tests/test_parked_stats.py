"""Parked statistics: a block's second moments wait in the work folder until their module
is decomposed, and come back bit for bit (shared inputs stay shared)."""

import torch

from rankcut.compression.engine import _last_use, park
from rankcut.compression.workfolder import WorkFolder
from rankcut.core import linalg


def _moment(n: int, seed: int) -> linalg.SecondMoment:
    moment = linalg.SecondMoment.zeros(n)
    moment.update(torch.randn(3, 7, n, generator=torch.Generator().manual_seed(seed)))
    return moment


def test_parked_moments_come_back_bit_identical_and_shared(tmp_path):
    work = WorkFolder(tmp_path / "out", "fingerprint")
    shared, alone = _moment(6, 0), _moment(4, 1)
    expected = {"shared": shared.xx.clone(), "alone": alone.xx.clone()}
    stats = park(work, "inputs", {"q": shared, "k": shared, "o": alone, "rows": torch.ones(2)})
    assert shared.xx is None and alone.xx is None  # the sums left memory
    assert len(list((work.path / "parked" / "inputs").glob("*.safetensors"))) == 2
    assert torch.equal(stats["rows"], torch.ones(2))  # not a second moment: kept as is
    q = _last_use(stats, "q")
    assert torch.equal(q.xx, expected["shared"]) and q.count == 21 and not q.consumable
    k = _last_use(stats, "k")
    assert k is q and k.consumable  # the last user of a shared input may consume it
    o = _last_use(stats, "o")
    assert torch.equal(o.mean(), expected["alone"] / 21)
    assert torch.equal(o.abs_sum, alone.abs_sum)
