"""``RunEvents``: what the server said happens at a step, that the job must act on there.

A stop (``stopped_at``: every rank stops at the same step), the step where a range test
switched to its ``then`` schedule (the job restores its weights there), and spike-guard
backoffs (the job rolls back there, once per spike). Each is tied to a step, not to when
the answer came, so every rank acts at the same step whichever rank's fetch learnt of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RunEvents"]


class RunEvents:
    """Events due at a step, and those already reached.

    Attributes:
        stopped_at: The step from which the run is stopped, if an operator stopped it.
        switch_due: The step where the range test switched schedules, until the job gets there.
        switched_at: That step, once the job got there.
        spikes_due: ``loss_spike`` events whose ``applied_at`` the job has not reached, in order.
    """

    def __init__(self) -> None:
        self.stopped_at: int | None = None
        self.switch_due: int | None = None
        self.switched_at: int | None = None
        self.spikes_due: list[dict[str, Any]] = []
        self._spikes_seen: set[tuple[int, int, int]] = set()
        self._spikes_from = 0  # spikes applied before this step are not the job's to handle

    @property
    def pending(self) -> bool:
        """Whether a switch or a spike is due (the step reaching it must look)."""
        return self.switch_due is not None or bool(self.spikes_due)

    def stopped(self, step: int) -> bool:
        return self.stopped_at is not None and step >= self.stopped_at

    def note(self, answer: Mapping[str, Any], step: int) -> None:
        """Take what an answer says; the job is at ``step``."""
        self.note_stop(answer, step)
        if answer.get("spikes"):
            self._note_spikes(answer["spikes"])
        switched = answer.get("switched_at")
        if switched is not None and self.switched_at is None and self.switch_due is None:
            self.switch_due = int(switched)

    def note_stop(self, answer: Mapping[str, Any], step: int) -> None:
        stopped_at = answer.get("stopped_at")
        if stopped_at is not None:
            self.stopped_at = int(stopped_at)
        elif answer.get("status") == "stopped" and self.stopped_at is None:
            self.stopped_at = step  # an older server: stop now

    def switch_reached(self, step: int) -> bool:
        """Whether ``step`` reaches the switch (true once; it is then ``switched_at``)."""
        if self.switch_due is None or step < self.switch_due:
            return False
        self.switched_at, self.switch_due = self.switch_due, None
        return True

    def spikes_reached(self, step: int) -> list[dict[str, Any]]:
        """The spikes whose backoff applies at or before ``step`` (each handed out once)."""
        reached = []
        while self.spikes_due and self.spikes_due[0]["applied_at"] <= step:
            reached.append(self.spikes_due.pop(0))
        return reached

    def restore(self, checkpoint: Mapping[str, Any], step: int) -> None:
        """A checkpoint of ``step`` was loaded: what it says; spikes before it were handled."""
        self.stopped_at = checkpoint.get("stopped_at")
        if checkpoint.get("switched_at") is not None:  # the range test was over at the checkpoint
            self.switched_at, self.switch_due = int(checkpoint["switched_at"]), None
        self.spikes_due, self._spikes_from = [], step + 1

    def _note_spikes(self, spikes: Sequence[Mapping[str, Any]]) -> None:
        for spike in spikes:
            key = (int(spike["applied_at"]), int(spike["rank"]), int(spike["step"]))
            if key in self._spikes_seen or key[0] < self._spikes_from:
                continue
            self._spikes_seen.add(key)
            self.spikes_due.append(dict(spike))
            self.spikes_due.sort(key=lambda e: (e["applied_at"], e["count"]))
