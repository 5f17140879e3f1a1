#include <xf86drm.h>
#include <drm.h>
#include <drm_mode.h>
