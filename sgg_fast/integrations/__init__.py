"""Integrations with training frameworks. Each submodule imports its framework itself, so
``import sgg_fast`` (and ``import sgg_fast.integrations``) imports none of them.

* :mod:`sgg_fast.integrations.transformers` — ``transformers.Trainer``.
"""
