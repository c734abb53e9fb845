"""Partitions shared by the assets: one partition per raw shard."""

import dagster as dg

raw_shards = dg.DynamicPartitionsDefinition(name="raw_shards")
