"""The dataset format, both directions: member naming and grouping into samples (`members`), the shard folder's
file names (`layout`), the tar header walk (`tarwalk`) and seek-by-index reads (`tarseek`).

Every reader and writer of shards goes through this package, so what `plait prep verify` passes is what
`plait train` reads. It imports nothing else of plait and no torch (webdataset, which imports torch, is
imported inside the functions that stream samples for training), so both halves import it without a cycle.

Reading over http(s) follows one address rule (`remote`), installed here so that no reader can open a shard
without it.
"""
from data_prep.shards import remote

remote.install()
