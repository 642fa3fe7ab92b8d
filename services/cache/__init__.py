"""SemanticCache: a response cache per tenant and model, kept in Redis.

Layers: `keys` (pure key derivation), `exact` (exact matches on the request key), `domain` (the `Cache`
facade the servicer calls: validation, layer order, hit/miss counters). The semantic layer (embeddings
and a FAISS index) will sit beside `exact` and be tried by `Cache.lookup` after an exact miss.
"""
