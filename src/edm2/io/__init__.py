"""File I/O of edm2: snapshots, published files, downloads and exports.
Import from the modules themselves (`from edm2.io.snapshot import load_snapshot`):

    snapshot    the snapshot file format (safetensors + JSON metadata): save, read, list
    loading     open a network from anything a user names: snapshot, run folder, published .pkl or URL
    official    safe import of the authors' published pickles (allow-list unpickler), reference statistics
    download    the cache folder ($EDM2_CACHE, ~/.cache/edm2) and the one download route
    hub         `edm2 export --format hf`: Hugging Face model folders (the conventions: edm2.nn.hub)
    diffusers   EDM2Pipeline, a diffusers pipeline, and `edm2 export --format diffusers` (needs diffusers)
"""
