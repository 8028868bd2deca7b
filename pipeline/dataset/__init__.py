"""The versioned-dataset core that clip datasets (pipeline.manifest, pipeline.ingest) and prediction datasets
(pipeline.predictions) share.

A dataset root holds immutable parts (Parquet files named by what they hold), per-version tables (errors, sources)
and one JSON manifest per version, published last and if-absent: the manifest is the only thing that makes a part
visible. Around that contract each module keeps one thing both kinds of dataset do alike, and imports only those
listed before it:

    versions   manifests/vNNNNNN.json, numbered from 1, never overwritten; what every manifest holds; run table names
    parts      publishing a Parquet file atomically, its digest, adopting a part a killed run published
    sources    a version's sources (a chain of delta tables), and listed inputs -> pending, already done, known failures
    failures   the errors table that remembers inputs which gave no output, by key and ETag
    commit     the next version from a run's new parts and failures: copy-on-write of superseded rows, tables, manifest
    runs       a running job's record: heartbeat, the parts it may publish or adopt, the versions a reader reads
    gc         removes what no kept version and no running job refers to

Nothing is imported here: import from the module that defines a name.
"""
