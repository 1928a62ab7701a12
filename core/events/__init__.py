"""Read events from ROOT files into selected physics objects (PHYSICS.md section 1)."""

from core.events.mappings import (
    MAPPINGS_DIR,
    CollectionMapping,
    ColumnMapping,
    MappingSchema,
    builtin_mappings,
    load_mapping,
)
from core.events.nonfinite import NON_FINITE_RULE, add_counts, count_non_finite, non_finite_note
from core.events.planning import (
    EVENT_TREE_NAMES,
    FILL_CHECK_ENTRIES,
    ReadPlan,
    plan_read,
    resolve_schema,
    tree_file_uuid,
)
from core.events.raw import LEPTON_TYPES, RawEvents
from core.events.reading import (
    DistinctFiles,
    concatenate_chunks,
    count_certified,
    iterate_events,
    load_events,
    read_entry_range,
    refuse_duplicate_inputs,
)
from core.events.schemas import (
    BUILTIN_SCHEMAS,
    SCHEMA_NAMES,
    AtlasOpenDataSchema,
    CartesianSchema,
    NanoAODSchema,
    PhysliteSchema,
    Schema,
    SchemaName,
)
from core.events.selection import ObjectSelection, select_objects

__all__ = [
    "BUILTIN_SCHEMAS",
    "EVENT_TREE_NAMES",
    "FILL_CHECK_ENTRIES",
    "LEPTON_TYPES",
    "MAPPINGS_DIR",
    "NON_FINITE_RULE",
    "SCHEMA_NAMES",
    "AtlasOpenDataSchema",
    "CartesianSchema",
    "CollectionMapping",
    "ColumnMapping",
    "DistinctFiles",
    "MappingSchema",
    "NanoAODSchema",
    "ObjectSelection",
    "PhysliteSchema",
    "RawEvents",
    "ReadPlan",
    "Schema",
    "SchemaName",
    "add_counts",
    "builtin_mappings",
    "concatenate_chunks",
    "count_certified",
    "count_non_finite",
    "iterate_events",
    "load_events",
    "load_mapping",
    "non_finite_note",
    "plan_read",
    "read_entry_range",
    "refuse_duplicate_inputs",
    "resolve_schema",
    "select_objects",
    "tree_file_uuid",
]
