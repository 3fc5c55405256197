"""Integrations with training frameworks. Each submodule imports its framework itself, so
``import sgg_fast`` (and ``import sgg_fast.integrations``) imports none of them.

* :mod:`sgg_fast.integrations.transformers` — ``transformers.Trainer`` (``sgg_training_args``,
  ``create_sgg_optimizer``, ``SGGCallback``).
* :mod:`sgg_fast.integrations.accelerate` — accelerate (``log_sgg``, ``clip_grad_norm_``).
* :mod:`sgg_fast.integrations.lightning` — Lightning (``SGGCallback``).

The recipes (and what to do about gradient clipping before SGG) are in the README's
"Frameworks" section.
"""
