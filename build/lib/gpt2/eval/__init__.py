"""Evaluation: perplexity on any text (`gpt2.eval.perplexity`) and HellaSwag (`gpt2.eval.hellaswag`).

Command line: `python -m gpt2.eval perplexity key=value ...` and `python -m gpt2.eval hellaswag key=value ...`
(keys: `gpt2.eval.config`).
"""
