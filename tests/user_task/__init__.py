"""A user's task written outside gfn_dist: what ``env.name`` / ``model.policy`` name by import path.

* ``user_task.multiset:Multiset``: multisets of ``size`` items over ``n_types`` types,
  built one item at a time (a DAG: every ordering of the items reaches the multiset).
* ``user_task.nets:make_policy``: a small residual network factory.
* ``user_task.bad``: deliberately broken objects for the bad-input tests.
"""
