"""Distillation on outputs: forward KL(teacher || student) over next-token distributions
(`undo distill`).

- `loss.py`: the model-level loss (the KL computed in chunks from hidden states so that the
  full logits never exist; the hidden-state term; the teacher of each micro-batch);
- `teachers.py`: batch-stream wrappers deciding where targets come from (`TeacherCache`:
  the teacher's top-k outputs on disk; `TeacherSwitch`: the second teacher's micro-batches);
- `run.py`: the student's initial weights, what trains, and `distill_checkpoint`.

The loss formulas themselves are in `undo_cli.losses` (`forward_kl`, `topk_forward_kl`,
`kd_objective`, `hidden_state_mse`).
"""

from undo_cli.distill.loss import (
    SECOND_TEACHER_KEY,
    chunked_distill_loss,
    final_hidden,
    hidden_term,
    kd_loss_fn,
    output_logits,
    student_hidden_states,
    teacher_states,
)
from undo_cli.distill.run import (
    RANDOM_STUDENT_SEED_OFFSET,
    DistillPlan,
    build_student,
    check_compatible,
    distill_checkpoint,
    distill_job,
    hidden_layer_list,
    plan_distill,
)
from undo_cli.distill.teachers import CACHE_INFO, TeacherCache, TeacherSwitch

__all__ = [
    "CACHE_INFO", "RANDOM_STUDENT_SEED_OFFSET", "SECOND_TEACHER_KEY", "DistillPlan",
    "TeacherCache", "TeacherSwitch", "build_student", "check_compatible",
    "chunked_distill_loss", "distill_checkpoint", "distill_job", "final_hidden",
    "hidden_layer_list", "hidden_term", "kd_loss_fn",
    "output_logits", "plan_distill", "student_hidden_states", "teacher_states",
]
