#include "client_name.h"

#include <stddef.h>

const char *client_name_or_default(const char *name)
{
    return name && name[0] ? name : CLIENT_NAME_DEFAULT;
}

bool client_name_valid(const char *name)
{
    if (!name)
        return false;
    size_t n = 0;
    for (; name[n]; n++) {
        char c = name[n];
        if (n >= CLIENT_NAME_MAX)
            return false;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return n > 0;
}
