/* broken.c - a deliberate syntax error, for the securecc demo's error case:
 * the server's compiler reports it, securecc prints it as gcc would and
 * exits with gcc's status (no local retry). */
#include <stdio.h>

int main(void)
{
    int answer = 42
    printf("%d\n", answer);
    return 0;
}
