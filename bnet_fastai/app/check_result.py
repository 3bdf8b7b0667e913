"""What one check of `bnet-fastai check` reports (`Result`), and the settings of the check's runs (`RUN`)."""
from __future__ import annotations

from dataclasses import dataclass, field

# the preflight's runs: the sample digits (1,437 training and 360 validation images), a mini xresnet; the
# device decides fp16 ("auto"), workers (None: the default), channels_last and the cached pipeline as in a study
RUN = dict(arch="xmininet", dataset="sample", size=32, bs=64, epochs=3, lr=1e-2)


@dataclass
class Result:
    """One check: its name, "pass", "fail" or "skip", what it measured (one line) and the numbers."""

    name: str
    status: str
    measured: str
    numbers: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.name:<10} {self.status.upper():<5} {self.measured}"
