"""Train (or reuse) the SentencePiece tokenizer for a data source.

    python scripts/train_tokenizer.py                                  # synthetic stories, bpe_4k
    python scripts/train_tokenizer.py data=tinystories_sample tokenizer=bpe_8k
    python scripts/train_tokenizer.py data=text_files data.name=zh tokenizer=bpe_8k_zh \
        data.train_files='[../shared/data/chinese_classics/*.txt]'

The model lands in data/tokenizers/<data.name>-<tokenizer.name>/ (see configs/tokenizer/).
"""

from tinyllama.cli import tokenizer_main

if __name__ == "__main__":
    tokenizer_main()
