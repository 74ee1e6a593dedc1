"""The index service: merges the result stream into FAISS and answers similarity queries over HTTP."""
