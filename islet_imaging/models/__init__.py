"""islet_imaging.models"""
