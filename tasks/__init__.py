"""Evaluation tasks: perplexity, FinEval-format multiple choice, FinGPT-format
classification, text generation. Entry point: tasks/main.py."""
