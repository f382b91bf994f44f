"""islet_imaging.measure"""
