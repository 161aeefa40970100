"""Heal a converted model by distillation from its original: KL(teacher ‖ student) (+ CE), output still stock.

Modules: `data` (training windows), `objective` (KL/CE), `trainable` (attn | all | lora), `loop` (training with
checkpoints), `checkpointing` (resume state), `write` (atomic stock output), `run` (the whole command).
"""

from kvconvert.heal.run import HealRequest, HealResult, run_heal

__all__ = ["HealRequest", "HealResult", "run_heal"]
