"""The baseline pruning methods Wanda-sp, FLAP, LLM-Pruner and (for mixtures of experts) REAP, as plugins.

Each method is one module whose ``gisp_methods`` hook returns its ``MethodSpec``; the modules are
registered only through the ``gisp_plugin`` entry-point group (``pyproject.toml``), exactly like a
third-party plugin, so the core never imports this package. The shared pieces of math live in
sibling modules: ``channels`` (activation-based channel scores), ``taylor`` (LLM-Pruner's group
importance) and ``local`` (the same pruning ratio in every layer).
"""
