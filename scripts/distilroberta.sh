#!/bin/bash
# Pretrain the DistilRoBERTa shape (RoBERTa-base with 6 layers) with masked LM;
# everything else is scripts/roberta_base.sh (same variables, same flags).
# Exports to RobertaForMaskedLM, like distilroberta-base.
DISTILROBERTA=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/roberta_base.sh" "$@"
