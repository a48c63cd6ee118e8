//! (placeholder: the ProviderAdmin implementation is being written)
