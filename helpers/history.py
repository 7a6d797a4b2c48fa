"""What a run leaves behind: one :class:`RoundRecord` per round (or epoch), collected in a :class:`History`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["RoundRecord", "History", "print_progress"]


@dataclass
class RoundRecord:
    """One row of a :class:`History`. ``bytes_up`` sums the accepted and rejected uploads;
    ``bounded`` counts the accepted updates the server's norm bound dropped or clipped."""

    round: int
    test_acc: float
    test_loss: float
    train_loss: float
    bytes_up: int
    bytes_down: int
    clients: int
    rejected: int
    samples: int      # training samples processed this round (the compute spent)
    seconds: float
    bounded: int = 0


@dataclass
class History:
    """Per-round records of a run, with a few conveniences for tables and figures."""

    label: str = ""
    rows: list[RoundRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        return [getattr(r, name) for r in self.rows]

    def evaluated(self) -> list[RoundRecord]:
        return [r for r in self.rows if not math.isnan(r.test_acc)]

    @property
    def final_accuracy(self) -> float:
        return self.evaluated()[-1].test_acc

    @property
    def bytes_up_per_client(self) -> float:
        """Mean uplink bytes one client sends in one round."""
        return sum(r.bytes_up for r in self.rows) / max(1, sum(r.clients for r in self.rows))

    @property
    def total_bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rows)

    @property
    def total_samples(self) -> int:
        return sum(r.samples for r in self.rows)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def summary(self) -> str:
        return (f"{self.label or 'run'}: {len(self.rows)} rounds, test accuracy {self.final_accuracy:.4f}, "
                f"{self.bytes_up_per_client / 1e3:.1f} kB up per client per round")


def print_progress(history: History, every: int, total: int) -> None:
    """Print the last row of ``history`` if its round is a multiple of ``every`` (or the last one)."""
    r = history.rows[-1]
    if every and (r.round % every == 0 or r.round == total):
        acc = "  -   " if math.isnan(r.test_acc) else f"{r.test_acc:.4f}"
        print(f"[{history.label or 'fedavg'}] round {r.round:3d}/{total}  test acc {acc}  "
              f"up {r.bytes_up / 1e3:9.1f} kB  rejected {r.rejected}"
              + (f"  norm-bounded {r.bounded}" if r.bounded else ""), flush=True)
