"""Progressive resizing: the train resolution as a function of the epoch, as FFCV's ResNet-50 recipes use it.

FFCV's `get_resolution(epoch)` (ffcv-imagenet, train_imagenet.py): the start size up to the ramp's first epoch,
the final size from its last, and in between the linear interpolation rounded to a multiple of 32. Epochs
count from 0. A function of the epoch alone, so a resumed or resized run trains each epoch at the size an
uninterrupted run would. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResolutionSchedule:
    final: int  # data.image_size: the size from end_epoch on (every epoch's, without a ramp)
    start: int = 0  # resolution.start_size; 0 is no ramp
    start_epoch: int = 0
    end_epoch: int = 0
    multiple: int = 32

    def at(self, epoch: int) -> int:
        if not self.start or epoch >= self.end_epoch:
            return self.final
        if epoch <= self.start_epoch:
            return self.start
        interp = self.start + (self.final - self.start) * (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return round(interp / self.multiple) * self.multiple

    @property
    def ramps(self) -> bool:
        return bool(self.start) and self.start != self.final

    def describe(self, epochs: int) -> str:
        """'160 px to epoch 65, then up to 192 px by epoch 76' or '224 px'."""
        if not self.ramps:
            return f"{self.final} px"
        changes = [(e, self.at(e)) for e in range(1, epochs) if self.at(e) != self.at(e - 1)]
        steps = ", ".join(f"{size} px from epoch {e + 1}" for e, size in changes)
        return f"{self.at(0)} px, then {steps}" if steps else f"{self.at(0)} px"
