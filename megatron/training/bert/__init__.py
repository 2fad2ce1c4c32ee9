"""BERT-family encoders (BERT, RoBERTa, DistilRoBERTa) on the same driver:

    arguments.py   the BERT flags (--bert-no-binary-head, --num-tokentypes, classification heads, ...)
    model.py       megatron-core's BertModel with a post-LN layer matching HF, its heads and providers
    inference.py   a trained encoder loaded for scoring (hidden states, MLM logits, class logits)

The entry points are pretrain_bert.py and finetune_classification.py; the data
is data/bert_dataset.py, the converter checkpoint_convert/bert.py.
"""
