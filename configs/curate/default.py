"""The default curation policy: drop the tokens of blocks older than 512k tokens that no session ever zoomed into,
keep their gists; past 2M tokens, unused spans keep only their LOD2 gists and above (bench/curation.py).

    python curate.py report --tree DIR --policy configs/curate/default.py
"""
min_age = 524288  # tokens behind the history's end before a block may lose its tokens
keep_recent = 65536  # the newest tokens are never curated
max_expansions = 0  # a block whose LOD1 gist was ever expanded keeps its tokens
min_idle = 524288  # nor may a block accessed within the last 512k tokens lose them
delete_age = 2097152  # spans older than 2M tokens with nothing in use also lose their LOD1 gists (0: never)
protect_tags = []  # tag names never curated (python curate.py tag --tree DIR --name NAME --span A:B)
protect_ranges = []  # [[a, b], ...] token ranges never curated
