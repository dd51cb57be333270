"""The per-chip memory plan of one compiled step (XLA's static plan), as a row, a markdown table row and JSON."""

from __future__ import annotations

import dataclasses
import json
import math

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-chip bytes of one compiled step (XLA's static memory plan)."""

    topology: str
    step: str
    mesh: str
    rules: str
    batch: int
    seq: int
    argument: int
    output: int
    temp: int
    alias: int
    code: int
    capacity: float
    compile_s: float
    note: str = ""
    attention: str = "xla"
    capacity_factor: float = 0.0  # 0: dropless
    flops: float = 0.0  # XLA's cost_analysis of the compiled program, per chip (0: not recorded)
    weights: str = ""  # parameter storage: "bfloat16", "float32", or a quantization ("int8", "fp8", "fp8:128")
    bytes_accessed: float = 0.0  # XLA's cost_analysis "bytes accessed", per chip (0: not recorded)

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp + self.code - self.alias

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def row(self) -> str:
        g = lambda b: f"{b / 1e9:7.2f}"  # noqa: E731
        return (f"{self.topology:<11} {self.step:<6} {self.mesh:<34} {self.rules:<8} {g(self.argument)} "
                f"{g(self.temp)} {g(self.output)} {g(self.alias)} {g(self.total)} / {self.capacity / 1e9:4.0f} GB  "
                f"{'fits' if self.fits else 'DOES NOT FIT'}  ({self.compile_s:.0f}s)")

    @property
    def chips(self) -> int:
        """64 for "v5p:4x4x4"; times the slices for "v5p:4x4x4 x2"."""
        topo, _, slices = self.topology.partition(" x")
        return math.prod(int(d) for d in topo.split(":")[1].split("x")) * (int(slices) if slices else 1)

    def markdown(self) -> str:
        g = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
        cf = f"{self.capacity_factor:g}" if self.capacity_factor else "dropless"
        rules = self.rules + (" (row-major cache)" if self.note == "cache layout default" else "")
        return (f"| {self.topology} | {self.chips} | {self.step} | {self.batch} x {self.seq} | {self.mesh} | "
                f"{rules} | {self.attention} | {cf} | {g(self.argument)} | {g(self.temp)} | {g(self.total)} | "
                f"{self.capacity / 1e9:.0f} | {'yes' if self.fits else '**no**'} |")

    MARKDOWN_HEADER = ("| topology | chips | step | batch x seq | mesh | rules | attention | experts | args | temp | "
                       "total | HBM | fits |\n|---|---:|---|---|---|---|---|---|---:|---:|---:|---:|---|")

    @classmethod
    def load(cls, path: str) -> list["MemoryPlan"]:
        """Plans written by `--json` (derived keys dropped, fields added since default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        with open(path) as fh:
            return [cls(**{k: v for k, v in d.items() if k in names}) for d in json.load(fh)]

    @staticmethod
    def header() -> str:
        return (f"{'topology':<11} {'step':<6} {'mesh':<34} {'rules':<8} {'args':>7} {'temp':>7} {'output':>7} "
                f"{'alias':>7} {'total':>7}   (GB per chip)")
