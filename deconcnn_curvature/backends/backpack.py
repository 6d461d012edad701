"""The optional ``backpack`` backend — being built."""
