"""The composition layer: the `rota` CLI, the embedded all-in-one cluster, the HTTP app and the
terminal table. The only package that imports both the coordinator and the workers."""
