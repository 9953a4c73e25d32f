"""Pack a data source into token shards (training the tokenizer first if it is missing).

    python scripts/prepare_data.py                                     # synthetic stories
    python scripts/prepare_data.py data=tinystories_sample data.num_workers=4
    python scripts/prepare_data.py data=text_files data.name=mine data.train_files='[texts/*.txt]'

Output: data/packed/<data.name>/<tokenizer fingerprint>/{meta.json,train/,val/}; rerunning
reuses a complete output (see configs/data/).
"""

from tinyllama.cli import prepare_main

if __name__ == "__main__":
    prepare_main()
