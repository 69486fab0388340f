"""Versioned, explicit data contracts between `kdtargets` and `kdtrain`.

Writers always pass these schemas; readers check them. Nothing is ever inferred from the first row.
"""

from ar2mdm.schemas.manifest import Manifest, RankInfo, ShardInfo, TeacherInfo, TokenizerInfo
from ar2mdm.schemas.v1 import (
    LOGPROB_TYPES,
    SCHEMA_VERSION,
    SchemaError,
    check_table_schema,
    shard_schema,
)

__all__ = [
    "LOGPROB_TYPES",
    "SCHEMA_VERSION",
    "SchemaError",
    "check_table_schema",
    "shard_schema",
    "Manifest",
    "RankInfo",
    "ShardInfo",
    "TeacherInfo",
    "TokenizerInfo",
]
