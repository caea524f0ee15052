/* notaplugin.c: a shared object without the qcowd_vfs_plugin entry point, which
 * the loader must refuse with a message. */
int notaplugin_answer(void);

int notaplugin_answer(void)
{
    return 42;
}
