"""Pydantic request and response models of the REST API (apart from the ORM models).

Families follow one pattern: ``XCreate`` (request body), ``XPublic`` (one resource),
``XsPublic`` (a page of them: ``items``, ``total``, ``limit``, ``offset``).
"""
