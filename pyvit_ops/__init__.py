"""pyvit_ops"""
