"""mesh_transformer: train, fine-tune, serve and export GPT-J-class models with JAX on a dp x mp mesh."""
